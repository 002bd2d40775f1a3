// Progressive enhancement only: without this file every page still works by plain form posts.
// The Ask form is sent in the background, with a visible, announced progress message, and
// only the answer part of the returned page replaces the old answer.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("ask-form");
  const progress = document.getElementById("progress");
  const area = document.getElementById("answer-area");
  if (!form || !progress || !area || !window.fetch) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    area.setAttribute("aria-busy", "true");
    progress.textContent = "Searching your documents...";
    try {
      const response = await fetch(form.action, {
        method: "POST", body: new URLSearchParams(new FormData(form)),
        credentials: "same-origin", redirect: "follow",
      });
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const answered = page.getElementById("answer-area");
      if (answered) {
        area.replaceWith(answered);
        progress.textContent = response.ok ? "Answer ready." : "The question was not answered.";
      } else {
        window.location.assign(response.url);
      }
    } catch (error) {
      progress.textContent = "The console could not be reached; try again.";
    } finally {
      button.disabled = false;
      const current = document.getElementById("answer-area");
      if (current) current.removeAttribute("aria-busy");
    }
  });
});

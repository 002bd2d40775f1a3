# The README's commands. Each installs what is missing first, so a fresh clone just works.
.PHONY: setup demo test up down status lint

setup:
	bash deployments/local/install.sh

demo: setup
	.venv/bin/headwater demo

test: setup
	.venv/bin/python -m pytest

up: setup
	.venv/bin/headwater up

down:
	.venv/bin/headwater down

status:
	.venv/bin/headwater status

lint:
	.venv/bin/ruff check .

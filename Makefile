# tidefs: the two commands of the README, and a few for development.
.PHONY: demo demo-stop test test-all lint bench chaos setup

setup:
	scripts/setup

# (1) Set up, then run a volume mounted in two regions on this machine.
demo:
	TIDEFS_SETUP=runtime scripts/setup
	scripts/demo

demo-stop:
	scripts/demo stop

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

# (2) Set up, then pass the whole test suite (Kafka broker and S3 endpoint are
# started by the test harness itself). The slow tier runs with `make test-all`.
test: lint
	.venv/bin/pytest -m "not slow" $(PYTEST_ARGS)

test-all: lint
	.venv/bin/pytest $(PYTEST_ARGS)

bench: setup
	.venv/bin/python -m bench

# Fault-injection scenarios: `make chaos CHAOS_ARGS="--seconds 120"`.
chaos: setup
	.venv/bin/python -m chaos run $(CHAOS_ARGS)

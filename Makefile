# The two commands of the README. Both set up what they need first.
.PHONY: run test unit lint bench bootstrap

bootstrap:
	bash tools/bootstrap.sh

run: bootstrap
	.venv/bin/labfleet up --config config/labfleet.yaml

test:
	bash tools/test.sh

unit: bootstrap
	.venv/bin/python -m pytest tests/unit -q

lint: bootstrap
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: bootstrap
	.venv/bin/python -m benchmarks.run

# The few commands a contributor needs. Each one sets up .venv first if it must.
.PHONY: demo test lint validate bench bench-compare check clean

demo:            ## run the whole pipeline in one process, no Redis needed
	@scripts/bootstrap
	.venv/bin/fxproxy demo

test:            ## unit, component, integration (real redis-server), fault, attack and nginx tests
	@scripts/bootstrap
	.venv/bin/python -m pytest -q -m "not slow"
	.venv/bin/python -m pytest -q -m slow -n 2  # fault tests that mostly wait: in parallel

lint:            ## ruff and mypy --strict
	@scripts/bootstrap
	.venv/bin/ruff check .
	.venv/bin/mypy

validate:        ## the deploy files (compose, Kubernetes, Dockerfile, nginx, Redis configs), offline
	@scripts/validate-deploy

check: test lint validate ## what CI runs

bench:           ## fan-out benchmark of the edge (see bench/README.md)
	@scripts/bootstrap
	.venv/bin/python bench/fanout.py

bench-compare:   ## the same workload against the naive design, websockets.broadcast and Node's ws
	@scripts/bootstrap
	.venv/bin/python bench/fanout.py --compare

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache bench/.build

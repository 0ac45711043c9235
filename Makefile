# The same commands CI and the README use.
.PHONY: test demo lint typecheck bench

test:
	scripts/test.sh

demo:
	scripts/demo.sh

lint:
	.venv/bin/ruff check halldyll_ray tests benchmarks scripts examples docker
	.venv/bin/ruff format --check halldyll_ray tests benchmarks scripts examples docker

typecheck:
	.venv/bin/mypy

bench:
	.venv/bin/python benchmarks/search_scale.py --sizes 100000

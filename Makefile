# The README's first two commands: `make demo` and `make test`.
.PHONY: setup demo test bench lint format

setup:
	@scripts/setup.sh

demo: setup
	@node bin/byom.js demo

test: setup
	@npm test

bench: setup
	@npm run bench

format: setup
	@npx prettier --write .

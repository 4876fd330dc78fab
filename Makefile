# Entry points for people and CI. `make test` is the command .ci/run calls.
.PHONY: test quickstart crds spacy-rules fmt

## Format check, clippy (-D warnings) and every test; prints one summary line.
test:
	@scripts/test.sh

## Run the embedded quickstart pipeline on this machine's CPU.
quickstart:
	cargo run --release -p taper-trainer -- quickstart

## Regenerate the CRD manifests in charts/taper/crds/ from the Rust types.
crds:
	cargo run -p taper-crds --bin crdgen

## Regenerate trainer-image/src/prepare/spacy_en.rs (MinHash word splitting) from the
## spaCy in .venv (`.venv/bin/pip install spacy`); its unit tests pin known splits.
spacy-rules:
	.venv/bin/python scripts/gen/spacy_en.py

fmt:
	cargo fmt --all

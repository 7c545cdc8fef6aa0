"""The evaluation protocol's named test sets and seeds, kept free of torch so `sra evaluate --help` and
`sra doctor` can name them at once."""

DEFAULT_SEEDS = (10, 20, 30, 40, 50)

# The paper's five test sets, relative to the data root.
SUITES: dict[str, dict[str, str]] = {
    "paper": {
        "dolly": "dolly/valid.jsonl",
        "self-inst": "self-inst/valid.jsonl",
        "vicuna": "vicuna/valid.jsonl",
        "sinst": "sinst/11_/valid.jsonl",
        "dialogsum": "dialogsum/valid.jsonl",
    }
}

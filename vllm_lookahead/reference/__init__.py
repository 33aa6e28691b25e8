"""The drafting algorithm in plain Python: the specification the compiled drafter must reproduce
chain for chain (`tests/test_compiled_drafter.py` drives both with the same traffic). Module for
module as in the package: `context_index`, `ngram_cache`, `jacobi_window`, `chain`, `drafter`.
Nothing on the production path imports it."""

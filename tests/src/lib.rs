//! Cross-crate scenarios live in `tests/tests/`; this library holds shared test fixtures.

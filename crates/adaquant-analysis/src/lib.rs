//! adaquant-analysis: see docs/ARCHITECTURE.md.

//! Second-moment statistics of MLP keys (SPEC-editors §2.4). Filled in by the statistics commit.

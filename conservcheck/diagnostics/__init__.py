"""The three diagnostics: loop integrals (Eq. 4), curl (Eq. 5) and the Stein operator (Eq. 20–21)."""

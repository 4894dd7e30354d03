"""The pure math, torch only: the rank-one updates and output corrections (Dherin et al. 2025 Eq. 8 / Thm A.2;
Innocenti & Achour 2025; Goldwaser et al. 2025), rank-K continuations, and the analysis algebra. Nothing here knows a
framework or a live model: it reads the plain tensors of :mod:`implicit_updates.capture`."""

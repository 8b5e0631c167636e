"""Few-shot adapters on top of CLIP: Tip-Adapter / Tip-X caches (with cached features), the IMO adapter's
training, and their building blocks. Methods that use them live in ``mtil/methods/``."""

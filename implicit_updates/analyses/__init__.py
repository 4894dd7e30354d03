"""The analyses: each an entry function and a result class with ``to_dict()``, written against the adapter
interface (:mod:`implicit_updates.adapters.base`) only."""

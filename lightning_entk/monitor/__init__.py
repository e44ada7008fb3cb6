"""The monitor: a framework-free core (:class:`Monitor`), its sentinel, its sinks and the keys
it logs. ``lightning_entk.callback.ENTKMonitor`` is the core as a Lightning callback.

    ``core``      :class:`Monitor`: start, step, end; full evaluations, the detector, state
    ``sentinel``  :class:`Sentinel`: the readout's kernel on held-out points, every epoch
    ``sinks``     where it writes: a dict, a TensorBoard ``SummaryWriter``, a logger
    ``keys``      every logged key, and which parameter group is the readout
"""

from __future__ import annotations

__all__ = ["DictSink", "Monitor", "Reading", "Sentinel", "TensorBoardSink", "as_sink"]

_WHERE = {
    "Monitor": "core",
    "Sentinel": "sentinel",
    "Reading": "sentinel",
    "DictSink": "sinks",
    "TensorBoardSink": "sinks",
    "as_sink": "sinks",
}


def __getattr__(name: str):
    # Imported on first use: the core imports the evaluation, which imports `keys` from here.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"lightning_entk.monitor.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lightning_entk.monitor' has no attribute {name!r}")

"""The monitor: a framework-free core (:class:`Monitor`), its sentinel and its sinks.
``lightning_entk.callback.ENTKMonitor`` is the core as a Lightning callback.

    ``core``      :class:`Monitor`: start, step, end; full evaluations, the detector, state
    ``sentinel``  :class:`Sentinel`: the readout's kernel on held-out points, every epoch
    ``sinks``     where it writes: a dict, a TensorBoard ``SummaryWriter``, loggers
    ``report``    its one-screen summary and its figure of the whole run

The keys it logs are :mod:`lightning_entk.keys`.
"""

from lightning_entk.monitor.core import Monitor
from lightning_entk.monitor.sentinel import Reading, Sentinel
from lightning_entk.monitor.sinks import DictSink, TensorBoardSink, as_sink

__all__ = ["DictSink", "Monitor", "Reading", "Sentinel", "TensorBoardSink", "as_sink"]

from ._shift import TemporalShift, temporal_shift
from ._sites import ResidualSite, find_residual_sites, site_table
from ._tracer import register_leaf_module, register_notrace_function, TraceError
from ._convert import TSMNet, convert

"""Operators' tools over the provider and consumer wings: ``governance`` (read and change the
fleet, audited), the ``cli`` (the ``thriftprobe`` command), the web ``console`` (needs the
``console`` extra), ``doctor`` (checks the backends) and ``call`` (call one method by hand).

Nothing outside this wing imports it: ``import thriftprobe`` loads none of it."""

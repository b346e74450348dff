"""Benchmarks: each is ``python -m benchmarks.<name>``; docs/benchmarks.md says what each measures and how to run it.

Every benchmark process sets glibc's allocator as the daemon does, first thing on import
(:func:`server.ops.host.keep_freed_memory`): an in-process reference measured without it is a coin toss between
two speeds of the same forward pass (docs/benchmarks.md, "benchmarks/allocator.py")."""

from server.ops.host import keep_freed_memory

keep_freed_memory()

"""Fixtures of the fault tests: the fleet's, reused.

* ``fleet`` (from ``tests/fleet``): forwarders, registries and servers in
  their own processes on 127.0.0.1, always stopped and reaped (a test that
  freezes a process with SIGSTOP thaws it in its own ``finally`` first);
* ``nat_engine``: the engine of the test, here and in every process it starts;
* ``registry_url``, ``redis_server`` and ``start_redis`` (a redis-server of
  one test, to kill and restart): the registries, from ``tests/fleet`` and
  ``tests/discovery``; without redis-server the Redis cases skip, or fail
  when ``CI`` is set;
* the leak check of ``tests/fleet`` after every test (threads, descriptors,
  registrations, tasks on fastnat's background loop);
* the ``e2e`` marker of ``tests/e2e``, for the partition test, which builds
  network namespaces (it skips without root, and fails instead when ``CI`` is set).
"""

from __future__ import annotations

from discovery.conftest import start_redis  # noqa: F401 - fixture, reused
from e2e.conftest import pytest_configure  # noqa: F401 - registers the e2e marker
from fleet.conftest import (  # noqa: F401 - fixtures and hooks, reused
    _clean_and_no_leaks,
    _warm_up,
    fleet,
    nat_engine,
    pytest_runtest_makereport,
    redis_executable,
    redis_server,
    registry_url,
)

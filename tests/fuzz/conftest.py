"""hypothesis profiles for the fuzz suite: ``ci`` (the default: a bounded, derandomized slice
that runs with every ``make test``) and ``long`` (``python -m tests.fuzz --long``)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

#: Examples per area in CI (four areas: a few hundred in all, a few seconds).
CI_EXAMPLES = 60
LONG_EXAMPLES = 10_000

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("CETVM_FUZZ_EXAMPLES", LONG_EXAMPLES)),
                          **_COMMON)
settings.load_profile(os.environ.get("CETVM_FUZZ_PROFILE", "ci"))

"""The cluster tests' fixtures (the `world`: control-plane objects, fabric emulator, unique driver
and Lease, and whatever fixtures it builds on) for the systemd tests that run the cluster role.
A star import, so a fixture the cluster tier adds for `world` is picked up here too."""

from tests.cluster.conftest import *  # noqa: F403

"""Hostile peers against a runner's TCP port.

``target`` is the runner program under attack, ``peer`` the attacker that
speaks the wire format by hand, ``harness`` what a test (or the benchmark)
uses to start a target process, drive its legitimate traffic and watch its
memory; ``test_hostile_peer`` holds the fuzz and the regressions.
"""

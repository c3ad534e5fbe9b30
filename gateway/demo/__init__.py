"""`make demo` (`python -m gateway.demo`): local servers, simulated devices and a gateway.

`localservers` (throw-away Prosody and Mosquitto on loopback) is also what the tests
(tests/conftest.py) and the benchmarks (bench/) start their servers with.
"""

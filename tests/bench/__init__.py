"""Tests of the benchmark tools (bench/) that are more than scripts: the synthetic models of bench/synth_model.py."""

"""Orchestration without UI: experiments, generation, metrics, results, run store, events."""

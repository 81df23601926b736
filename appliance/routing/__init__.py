"""Routing: when a study is stable, which destinations get which of its instances.

Owns: the rule engine (ordered TOML rules plus a fallback), the stability pass that turns
quiet studies (and late deltas) into jobs, and the retry policy. May not touch: the network
(dispatch sends) or files.
"""

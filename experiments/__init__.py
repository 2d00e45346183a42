"""Threat-model experiments: ``fedbrats experiment compare`` (issue 7).

:mod:`experiments.compare` (orchestration, CLI), :mod:`experiments.received` (what the aggregator
saw), :mod:`experiments.casedata` (members, non-members, the attacker's own data),
:mod:`experiments.studies` (the attacks of one configuration), :mod:`experiments.attacks` (pure
attack and scoring functions), :mod:`experiments.report` and :mod:`experiments.plots`.
See ``docs/THREAT_MODEL.md``.
"""

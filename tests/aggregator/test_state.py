"""The round state machine alone: no gRPC, no clock, no sleeping."""

from aggregator import state as sm

P = sm.Params(total_rounds=2, expected_sites=3, min_sites=2, join_timeout_s=10,
              round_timeout_s=100, metrics_timeout_s=50)


def run(state, *events):
    effects = []
    for ev in events:
        state, eff = sm.advance(state, ev)
        effects.extend(eff)
    return state, effects


def test_full_federation_happy_path():
    s = sm.initial_state(P, 0.0)
    s, eff = run(s, sm.SiteJoined("site-1", 1), sm.SiteJoined("site-2", 2))
    assert s.stage is sm.Stage.JOINING and eff == []
    s, eff = run(s, sm.SiteJoined("site-3", 3))
    assert s.stage is sm.Stage.TRAINING and s.round == 1
    assert eff == [sm.StartRound(1, ("site-1", "site-2", "site-3"))]
    s, eff = run(s, sm.UpdateAccepted("site-2", 1, 4), sm.UpdateAccepted("site-1", 1, 5))
    assert eff == [] and s.submitted == ("site-1", "site-2")
    s, eff = run(s, sm.UpdateAccepted("site-3", 1, 6))
    assert s.stage is sm.Stage.AGGREGATING
    assert eff == [sm.AggregateRound(1, ("site-1", "site-2", "site-3"))]
    s, eff = run(s, sm.RoundAggregated(1, 7))
    assert s.stage is sm.Stage.TRAINING and s.round == 2 and s.completed_round == 1
    s, eff = run(s, *[sm.UpdateAccepted(f"site-{i}", 2, 8) for i in (1, 2, 3)])
    s, eff = run(s, sm.RoundAggregated(2, 9))
    assert s.stage is sm.Stage.FINISHING and s.completed_round == 2
    s, eff = run(s, *[sm.MetricsReported(f"site-{i}", 2, 10) for i in (1, 2, 3)])
    assert s.stage is sm.Stage.DONE and not s.failed
    assert isinstance(eff[-1], sm.Finished) and not eff[-1].failed


def test_duplicate_and_stale_updates_count_once():
    s = sm.initial_state(P, 0.0)
    s, _ = run(s, *[sm.SiteJoined(f"site-{i}", 0) for i in (1, 2, 3)])
    s, eff = run(s, sm.UpdateAccepted("site-1", 1, 1), sm.UpdateAccepted("site-1", 1, 2))
    assert s.submitted == ("site-1",) and eff == []
    s, eff = run(s, sm.UpdateAccepted("site-2", 0, 3))  # stale round
    assert s.submitted == ("site-1",)
    s, eff = run(s, sm.UpdateAccepted("site-9", 1, 3))  # not a participant
    assert s.submitted == ("site-1",)


def test_round_deadline_aggregates_with_min_sites():
    s = sm.initial_state(P, 0.0)
    s, _ = run(s, *[sm.SiteJoined(f"site-{i}", 0) for i in (1, 2, 3)])
    s, _ = run(s, sm.UpdateAccepted("site-1", 1, 1), sm.UpdateAccepted("site-3", 1, 2))
    s, eff = run(s, sm.Tick(99.9))
    assert eff == [] and s.stage is sm.Stage.TRAINING
    s, eff = run(s, sm.Tick(100.0))
    assert eff == [sm.AggregateRound(1, ("site-1", "site-3"))]


def test_round_deadline_with_too_few_updates_fails_and_releases_nothing():
    s = sm.initial_state(P, 0.0)
    s, _ = run(s, *[sm.SiteJoined(f"site-{i}", 0) for i in (1, 2, 3)])
    s, _ = run(s, sm.UpdateAccepted("site-1", 1, 1))
    s, eff = run(s, sm.Tick(150))
    assert s.stage is sm.Stage.DONE and s.failed
    assert "only 1 update(s) of the 2 needed" in s.message
    assert not any(isinstance(e, sm.AggregateRound) for e in eff)
    # Nothing moves a finished federation.
    s2, eff2 = run(s, sm.UpdateAccepted("site-2", 1, 151), sm.Tick(1000))
    assert s2 == s and eff2 == []


def test_join_timeout_starts_with_min_sites_or_fails():
    s = sm.initial_state(P, 0.0)
    s, _ = run(s, sm.SiteJoined("site-1", 1), sm.SiteJoined("site-2", 2))
    s, eff = run(s, sm.Tick(10.5))
    assert eff == [] and s.stage is sm.Stage.JOINING  # 10 s after the first join is 11
    s, eff = run(s, sm.Tick(11))
    assert s.stage is sm.Stage.TRAINING and eff == [sm.StartRound(1, ("site-1", "site-2"))]

    lonely = sm.initial_state(P, 0.0)
    lonely, _ = run(lonely, sm.SiteJoined("site-1", 1))
    lonely, eff = run(lonely, sm.Tick(10))
    assert lonely.failed and "only 1 of the 2 sites needed joined" in lonely.message


def test_metrics_timeout_finishes():
    p = sm.Params(1, 2, 2, 10, 100, 50)
    s = sm.initial_state(p, 0.0)
    s, _ = run(s, sm.SiteJoined("a", 0), sm.SiteJoined("b", 0),
               sm.UpdateAccepted("a", 1, 1), sm.UpdateAccepted("b", 1, 1),
               sm.RoundAggregated(1, 2), sm.MetricsReported("a", 1, 3))
    assert s.stage is sm.Stage.FINISHING
    s, _ = run(s, sm.Tick(51))
    assert s.stage is sm.Stage.FINISHING
    s, eff = run(s, sm.Tick(52))
    assert s.stage is sm.Stage.DONE and not s.failed


def test_events_out_of_place_are_ignored():
    s = sm.initial_state(P, 0.0)
    s2, eff = run(s, sm.UpdateAccepted("site-1", 1, 1), sm.RoundAggregated(1, 1),
                  sm.MetricsReported("site-1", 1, 1))
    assert s2 == s and eff == []


def test_abort():
    s = sm.initial_state(P, 0.0)
    s, eff = run(s, sm.Abort("operator stop", 1))
    assert s.failed and s.message == "operator stop" and eff == [sm.Finished(True, "operator stop")]

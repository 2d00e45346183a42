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
    assert eff == [sm.StageDeadline(1, "training", ("site-2",)),
                   sm.AggregateRound(1, ("site-1", "site-3"))]


def test_round_deadline_with_too_few_updates_fails_and_releases_nothing():
    s = sm.initial_state(P, 0.0)
    s, _ = run(s, *[sm.SiteJoined(f"site-{i}", 0) for i in (1, 2, 3)])
    s, _ = run(s, sm.UpdateAccepted("site-1", 1, 1))
    s, eff = run(s, sm.Tick(150))
    assert s.stage is sm.Stage.DONE and s.failed
    assert "round 1 stage training: only 1 of the 2 needed update(s)" in s.message
    assert not any(isinstance(e, sm.AggregateRound) for e in eff)
    # Nothing moves a finished federation.
    s2, eff2 = run(s, sm.UpdateAccepted("site-2", 1, 151), sm.Tick(1000))
    assert s2 == s and eff2 == []


def test_join_timeout_starts_with_min_sites_and_otherwise_keeps_waiting():
    s = sm.initial_state(P, 0.0)
    s, _ = run(s, sm.SiteJoined("site-1", 1), sm.SiteJoined("site-2", 2))
    s, eff = run(s, sm.Tick(10.5))
    assert eff == [] and s.stage is sm.Stage.JOINING  # 10 s after the first join is 11
    s, eff = run(s, sm.Tick(11))
    assert s.stage is sm.Stage.TRAINING and eff == [sm.StartRound(1, ("site-1", "site-2"))]

    lonely = sm.initial_state(P, 0.0)
    lonely, eff = run(lonely, sm.Tick(1000))  # nobody yet: a daemon keeps waiting
    assert lonely.stage is sm.Stage.JOINING and not lonely.failed
    lonely, _ = run(lonely, sm.SiteJoined("site-1", 1001), sm.Tick(5000))
    assert lonely.stage is sm.Stage.JOINING and not lonely.failed
    lonely, eff = run(lonely, sm.SiteJoined("site-2", 5001))
    assert lonely.stage is sm.Stage.JOINING  # 2 of 3: wait join_timeout_s after the first join
    lonely, eff = run(lonely, sm.Tick(5002))
    assert lonely.stage is sm.Stage.TRAINING


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


MP = sm.Params(total_rounds=1, expected_sites=5, min_sites=2, join_timeout_s=10,
               round_timeout_s=100, metrics_timeout_s=50, mode="mask", threshold=3,
               stage_timeout_s=20)
FIVE = tuple(f"site-{i}" for i in range(1, 6))


def _mask_round_until(stage_drops):
    """Run a mask-mode round where ``stage_drops[stage]`` sites stop acting from that stage on."""
    s = sm.initial_state(MP, 0.0)
    s, effects = run(s, *[sm.SiteJoined(x, 0) for x in FIVE])
    alive = list(FIVE)
    t = 1.0
    for stage in (sm.Stage.ADVERTISE_KEYS, sm.Stage.SHARE_KEYS, sm.Stage.MASKED_INPUT,
                  sm.Stage.UNMASK):
        alive = [x for x in alive if x not in stage_drops.get(stage, ())]
        assert s.stage is stage, (s.stage, stage)
        s, eff = run(s, *[sm.Submitted(x, 1, stage, t) for x in alive])
        effects += eff
        if s.stage is stage:  # someone is missing: wait for the deadline
            t = sm._deadline(s)
            s, eff = run(s, sm.Tick(t))
            effects += eff
        if s.stage is sm.Stage.DONE:
            break
        t += 1
    return s, effects


def test_mask_round_all_present():
    s, eff = _mask_round_until({})
    assert s.stage is sm.Stage.AGGREGATING
    assert eff[-1] == sm.UnmaskRound(1, FIVE, FIVE, FIVE)


def test_mask_round_site_drops_before_unmask_k07a():
    s, eff = _mask_round_until({sm.Stage.UNMASK: ("site-3",)})
    assert eff[-1] == sm.UnmaskRound(1, FIVE, FIVE, tuple(x for x in FIVE if x != "site-3"))


def test_mask_round_site_drops_before_masked_input_k07b():
    s, eff = _mask_round_until({sm.Stage.MASKED_INPUT: ("site-5",)})
    four = FIVE[:4]
    assert eff[-1] == sm.UnmaskRound(1, FIVE, four, four)
    assert s.contributors == four


def test_mask_round_too_many_drops_aborts_k07c():
    s, eff = _mask_round_until({sm.Stage.UNMASK: ("site-1", "site-2", "site-3")})
    assert s.failed
    assert "stage unmask: only 2 of the 3 needed unmask share set(s) arrived" in s.message
    assert not any(isinstance(e, sm.UnmaskRound) for e in eff)


def test_mask_stage_deadlines():
    s = sm.initial_state(MP, 0.0)
    s, _ = run(s, *[sm.SiteJoined(x, 0) for x in FIVE])
    s, _ = run(s, *[sm.Submitted(x, 1, sm.Stage.ADVERTISE_KEYS, 1) for x in FIVE[:3]])
    s, eff = run(s, sm.Tick(19.9))
    assert s.stage is sm.Stage.ADVERTISE_KEYS
    s, eff = run(s, sm.Tick(20))
    assert s.stage is sm.Stage.SHARE_KEYS and s.expected == FIVE[:3]
    # A site outside U1 cannot join in later stages.
    s2, _ = run(s, sm.Submitted("site-5", 1, sm.Stage.SHARE_KEYS, 21))
    assert s2.submitted == ()
    # Submissions for the wrong stage are ignored.
    s3, _ = run(s, sm.Submitted("site-1", 1, sm.Stage.MASKED_INPUT, 21))
    assert s3.submitted == ()


def test_site_missing_a_deadline_sits_out_later_rounds_until_it_rejoins():
    p = sm.Params(total_rounds=3, expected_sites=3, min_sites=2, join_timeout_s=10,
                  round_timeout_s=100, metrics_timeout_s=50)
    s = sm.initial_state(p, 0.0)
    s, _ = run(s, *[sm.SiteJoined(f"site-{i}", 0) for i in (1, 2, 3)])
    s, _ = run(s, sm.UpdateAccepted("site-1", 1, 1), sm.UpdateAccepted("site-2", 1, 1))
    s, eff = run(s, sm.Tick(100), sm.RoundAggregated(1, 101))
    assert s.inactive == ("site-3",)
    assert s.round == 2 and s.participants == ("site-1", "site-2")
    s, _ = run(s, sm.SiteJoined("site-3", 102))
    assert s.inactive == ()
    s, _ = run(s, sm.UpdateAccepted("site-1", 2, 103), sm.UpdateAccepted("site-2", 2, 103),
               sm.RoundAggregated(2, 104))
    assert s.participants == ("site-1", "site-2", "site-3")


def test_excluded_site_no_longer_holds_up_the_round_k10():
    p = sm.Params(total_rounds=1, expected_sites=4, min_sites=2, join_timeout_s=10,
                  round_timeout_s=100, metrics_timeout_s=50)
    s = sm.initial_state(p, 0.0)
    s, _ = run(s, *[sm.SiteJoined(f"site-{i}", 0) for i in (1, 2, 3, 4)])
    s, _ = run(s, *[sm.UpdateAccepted(f"site-{i}", 1, 1) for i in (1, 3, 4)])
    assert s.stage is sm.Stage.TRAINING
    s, eff = run(s, sm.Excluded("site-2", 1, 2))
    assert eff == [sm.AggregateRound(1, ("site-1", "site-3", "site-4"))]
    assert "site-2" in s.inactive

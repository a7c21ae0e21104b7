"""E3 planner: what should run where.

One module per role (imports stay cheap: nothing here is imported eagerly):

- profiles.py  DeviceProfile: seconds per batch of each block, ramp and head on a device type
- profiler.py  profile_model / cached_profile: measure an EarlyExitModel; disk cache
- problem.py   Problem, DeviceType: a planning problem (from_json for e3-plan files)
- cost_model.py the one cost model: value(problem, plan) term by term (rows, per-batch and node costs)
- dp.py        the DP: one batch size's exact searches of that model (BatchSearch)
- solve.py     solve(problem) -> SolveResult: searches over batch sizes, candidates with the queue, links
- baselines.py the stock and EE-as-is plans every solve is checked against, and the fastest plan
- plan.py      Plan, Group, SolveResult (to_json / from_json; the runtime sets Plan.epoch)
- forecast.py  Forecaster (update / forecast), SurvivalEstimator, IntervalCounts
- calibration.py measurements of a running node -> the cost model's overheads
- plan_watch.py PlanWatch: is the running plan delivering its prediction? (never lose, by measurement)
- replan.py    ReplanPolicy: when to re-solve, when to switch (injected clock)
- simulator.py SIMULATION: discrete-event replay of a plan
- config.py    PlannerConfig: validated settings and factories
- cli.py       bin/e3-plan
- errors.py    the exceptions, each saying when it is raised
"""

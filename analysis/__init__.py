"""Is the new recommender better, and how sure are we: CTR lift statistics and the nightly report.

Statistics are pure functions over plain frozen dataclasses (no I/O), in the style of
GrowthBook's gbstats; the database aggregation and the report feed them sums:

- stats: per-arm sufficient statistics (ArmStats), delta-method CTR lift with CIs and p-values,
  Fieller, CUPED, SRM, multiple-arm corrections, winsorisation, `analyze` for a whole experiment
- sequential: always-valid confidence sequences (Waudby-Smith et al.) tuned by N*
- power: users and days needed for a minimum detectable lift
- timeviews: daily CTR, cumulative lift, lift by days since first exposure
- decision: ship / rollback / inconclusive / keep running, with reasons
- synthetic: simulated users with clustered clicks, for checking the error rates
- cli: `abrec analyze-file` on an exported per-user table
"""

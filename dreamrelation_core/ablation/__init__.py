"""The synthetic-world ablation study (docs/ablation.md): world, judge, base, study."""

"""The bundled search spaces (`--space demo|quick|quality|paper|ablation`), installed as rayad._bundled.tune_spaces."""

"""The bundled search spaces (`--space quick|paper|ablation`), installed as rayad._bundled.tune_spaces."""

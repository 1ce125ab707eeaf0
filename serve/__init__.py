"""The Serve config template, installed as rayad._bundled.serve."""

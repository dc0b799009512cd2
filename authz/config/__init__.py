"""Configuration read from files: the settings schema and the policy file, both through
one YAML loader that reports file, line and column."""

"""Bundled YAML configs (package data of `maxdpo.configs`)."""

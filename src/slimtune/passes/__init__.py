"""Passes that write or transform plans: SPT allocation, Light-PEFT pruning."""

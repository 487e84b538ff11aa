"""Preference tuning: reward models, DPO/IPO and PPO-based RLHF."""

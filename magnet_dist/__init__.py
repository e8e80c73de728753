"""magnet_dist: distributed MAGNET trainer."""

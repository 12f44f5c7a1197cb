-- The update rule of a snapshot's EMA when it is not EDM2's power-function rule that its
-- sigma_rel names (ema-pytorch's update_every, constant-beta EMAs, explicit tables): a JSON
-- object with a "kind" (phema::RealisedProfile). NULL: the power function of sigma_rel.
ALTER TABLE snapshots ADD COLUMN profile TEXT CHECK (profile IS NULL OR json_valid(profile));

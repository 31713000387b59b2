"""Training engines behind the recipes: DINO at the tile and region levels, end-to-end and slide-level
training, the cross-validation fold loop and what runs it (rescoring, the colour baseline), checkpoints and exports."""

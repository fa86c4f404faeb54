"""Training engine: the LightningModule, EMA, callbacks, data module, LR schedule and export."""

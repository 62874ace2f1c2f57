"""The shared contract of sam3d-jobs: errors, inputs (images, masks), poses and frames."""

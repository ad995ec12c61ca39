"""The Mojo runtime: builds and loads the Mojo extension that runs the weight file."""

"""Small apps that tests run in their own processes."""

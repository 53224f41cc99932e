"""unipeft.data"""

// Deliberately empty: the package must work in a Vite app without extra setup.
export default {};

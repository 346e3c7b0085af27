// SMART Backend Services client assertions (RFC 7523) made with an independent JOSE
// implementation (panva/jose), for medvault's service-client tests.
//
//   node assertion.mjs keygen                        prints {"private": JWK, "public": JWK} (ES384)
//   node assertion.mjs sign PRIVATE_JWK CLIENT_ID AUD [EXP_OFFSET_SECS] [JTI]
//                                                    prints the signed assertion
import { SignJWT, exportJWK, generateKeyPair, importJWK } from 'jose';
import { randomUUID } from 'node:crypto';

const [, , mode, ...args] = process.argv;
if (mode === 'keygen') {
  const { privateKey, publicKey } = await generateKeyPair('ES384', { extractable: true });
  const kid = randomUUID();
  console.log(JSON.stringify({
    private: { ...(await exportJWK(privateKey)), kid, alg: 'ES384' },
    public: { ...(await exportJWK(publicKey)), kid, alg: 'ES384', use: 'sig' },
  }));
} else if (mode === 'sign') {
  const [jwk, clientId, aud, expOffset = '240', jti = randomUUID()] = args;
  const key = await importJWK(JSON.parse(jwk), 'ES384');
  const now = Math.floor(Date.now() / 1000);
  console.log(await new SignJWT({ jti })
    .setProtectedHeader({ alg: 'ES384', kid: JSON.parse(jwk).kid, typ: 'JWT' })
    .setIssuer(clientId)
    .setSubject(clientId)
    .setAudience(aud)
    .setExpirationTime(now + Number(expOffset))
    .sign(key));
} else {
  console.error('usage: node assertion.mjs keygen | sign PRIVATE_JWK CLIENT_ID AUD [EXP_OFFSET] [JTI]');
  process.exit(2);
}

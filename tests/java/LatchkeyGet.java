// GET one URL through latchkey with java.net.http.HttpClient, the way README "Clients" says:
// the proxy from -Dhttps.proxyHost/-Dhttps.proxyPort, latchkey's CA from
// -Djavax.net.ssl.trustStore, Basic proxy auth re-enabled for tunnels with
// -Djdk.http.auth.tunneling.disabledSchemes= and an Authenticator that answers the proxy's 407
// with the agent name and token taken from HTTPS_PROXY (set by `latchkey run`).
// Prints the status line and the body. Run: java <props> LatchkeyGet.java URL
import java.net.Authenticator;
import java.net.PasswordAuthentication;
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class LatchkeyGet {
    public static void main(String[] args) throws Exception {
        String userInfo = URI.create(System.getenv("HTTPS_PROXY")).getRawUserInfo();
        int colon = userInfo.indexOf(':');
        String agent = userInfo.substring(0, colon);
        char[] token = userInfo.substring(colon + 1).toCharArray();
        HttpClient client = HttpClient.newBuilder()
            .proxy(ProxySelector.getDefault())
            .authenticator(new Authenticator() {
                @Override
                protected PasswordAuthentication getPasswordAuthentication() {
                    if (getRequestorType() != RequestorType.PROXY) {
                        return null;
                    }
                    return new PasswordAuthentication(agent, token);
                }
            })
            .build();
        HttpResponse<String> resp = client.send(
            HttpRequest.newBuilder(URI.create(args[0])).build(),
            HttpResponse.BodyHandlers.ofString());
        System.out.println(resp.statusCode());
        System.out.println(resp.body());
    }
}

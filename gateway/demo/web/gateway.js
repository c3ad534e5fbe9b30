/* The demo page's additions to Converse.js 14 (gateway/demo/webchat.py writes its settings into
 * index.html). Converse itself is not changed; this plugin:
 * - puts the gateway in the roster and subscribes to its presence: Converse's "accept" dialog
 *   approves a contact request without subscribing back (auto_subscribe below does), and a
 *   roster that only approved the gateway never shows it online;
 * - shows each contact's presence status under its name in the roster, and the chat partner's in
 *   the chat's header: the gateway's status is its health ("Demo greenhouse: 4/4 devices OK");
 * - shows the gateway's replies in a fixed-width font, so their columns line up;
 * - replaces the login page's footer (sponsors' logos loaded from conversejs.org) with the demo's notes;
 * - fills Converse's ad-hoc commands form with the gateway's full JID: the server answers a
 *   command list asked of the bare JID itself, with nothing (docs/webchat.md).
 */
(function () {
  'use strict';
  const settings = JSON.parse(document.getElementById('iot-gateway-settings').textContent);
  const { html } = converse.env;

  // The gateway's replies in a fixed-width font, so the columns of its plain-text rows line up
  // (Converse shows a message's text in a proportional font).
  const mono = document.createElement('style');
  mono.textContent = `.conversejs .chat-msg[data-from^="${CSS.escape(settings.gateway + '/')}"] .chat-msg__text
    { font-family: ui-monospace, 'DejaVu Sans Mono', monospace; font-size: 0.92em; }`;
  document.head.append(mono);

  // Converse defines its elements as it initializes: patched once they exist.
  customElements.whenDefined('converse-roster-contact').then(() => {
    const Contact = customElements.get('converse-roster-contact');
    const render = Contact.prototype.render;
    Contact.prototype.render = function () {
      const shown = render.call(this);
      const status = this.model?.get?.('requesting') ? null : this.model?.get?.('status');
      return status ? html`${shown}<div class="iot-gateway-status">${status}</div>` : shown;
    };
  });

  // Under the login form, instead of Converse's footer (its sponsors' logos come from conversejs.org):
  // what to log in with, where ad-hoc commands are, the CA to trust.
  customElements.whenDefined('converse-footer').then(() => {
    customElements.get('converse-footer').prototype.render = () => html`
      <footer class="footer mt-auto py-3 iot-gateway-notes text-center">
        <p>Log in as <code>${settings.user}</code>: the password is in the terminal running
          <code>make demo</code>. Then chat with ${settings.name}: <code>help</code>.</p>
        <p>Ad-hoc commands (the gear, then Commands): <code>${settings.adhoc}</code></p>
        <p>The certificate comes from the demo's own CA:
          <a href="ca.pem" download="iot-gateway-demo-ca.pem">ca.pem</a> (docs/webchat.md says how to trust it).</p>
        <p class="subdued">Converse.js ${settings.converse}, served by the demo's Prosody.</p>
      </footer>`;
  });

  // (Lifecycle callbacks are fixed when an element is defined: Converse's `initialize`, which its
  // connectedCallback calls, is looked up each time.)
  customElements.whenDefined('converse-adhoc-commands').then(() => {
    const AdHoc = customElements.get('converse-adhoc-commands');
    const initialize = AdHoc.prototype.initialize;
    AdHoc.prototype.initialize = function () {
      if (!this.iotGatewayFilled) {
        this.iotGatewayFilled = true;
        this.jid = settings.adhoc;
      }
      return initialize.call(this);
    };
  });

  converse.plugins.add('iot-gateway-demo', {
    initialize() {
      const { api } = this._converse;

      api.listen.on('rosterContactsFetched', async () => {
        const contact = await api.contacts.get(settings.gateway);
        if (!contact) {
          await api.contacts.add({ jid: settings.gateway, name: settings.name }, true, true);
        } else if (!['to', 'both'].includes(contact.get('subscription')) && contact.get('ask') !== 'subscribe') {
          contact.subscribeToPresence();
        }
      });

      api.listen.on('chatBoxInitialized', async (chat) => {
        if (chat.get('type') !== 'chatbox') return;
        const contact = await api.contacts.get(chat.get('jid'));
        if (!contact) return;
        const copy = () => chat.save({ status: contact.get('status') || null });
        copy();
        chat.listenTo(contact, 'change:status', copy);
      });
    },
  });

  converse.initialize({
    websocket_url: `wss://${location.host}${settings.websocket_path}`,
    discover_connection_methods: false,
    allow_registration: false,
    authentication: 'login',
    auto_login: false,
    jid: settings.user,
    default_domain: settings.domain,
    view_mode: 'fullscreen',
    assets_path: new URL('dist/', location.href).href,
    whitelisted_plugins: ['iot-gateway-demo'],
    auto_subscribe: true,
    allow_contact_requests: true,
    show_client_info: false,
    show_controlbox_by_default: true,
    play_sounds: false,
    show_desktop_notifications: false,
    i18n: 'en',
    loglevel: 'warn',
  });
})();
